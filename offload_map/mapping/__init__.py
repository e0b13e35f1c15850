"""Stage 2, map: where every module lives, as plain data.

- ``placement``: the three placements;
- ``device_map``: ``DeviceMap``, printable, editable and serializable;
- ``compiler``: a strategy (and a budget) -> a map;
- ``ownership``: which entry owns which tensor (the map's one rule);
- ``memory``: the one device-memory formula; ``sizes``: budgets and byte counts; ``schema``: reading JSON;
  ``devices``: choosing the target device.

Nothing here binds a map to live tensors for running or touches device memory.
"""
