"""Stage 3, plan: a map resolved against the pipeline, and the budget planner's choices.

- ``bind``: a ``DeviceMap`` + the collected pipeline -> an ``ExecutionPlan`` (units of tensors, rings of
  streamed blocks), after checking every rule; the last step before the runtime;
- ``cost_model``, ``planner``: the predicted step timeline and the fastest plan within a budget;
- ``profile``: measured numbers kept as JSON, for planning without a GPU.

Pure Python on metadata: nothing here copies data or touches a device.
"""
