"""The paper's Frozen Lake study (section 5.3): `iftune frozenlake`, see docs/frozenlake.md."""
