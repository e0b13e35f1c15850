"""Stage 1, collect: what a pipeline holds.

- ``components``: its components (DiTs, encoders, VAEs, others) and their roles;
- ``blocks``: each DiT's block lists;
- ``tensors``: every parameter and buffer once, with the other places that hold the same tensor.

Nothing here decides a placement or touches a device; one ``discover`` per dispatch feeds every later stage.
"""
