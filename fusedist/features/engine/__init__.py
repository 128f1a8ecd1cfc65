"""The batch-inference engine behind ``fusedist cache`` and ``fusedist embed``: one core, two
drivers.

- :mod:`.core`: the engine spec, shard decoding, the embedder (every encoder on a chunk, its
  part written), the driver's row bookkeeping and stats, the device chooser;
- :mod:`.raydata`: the Ray Data driver (decode tasks, an autoscaling encoder actor pool,
  finisher actors) and its resources (``engine_pool``);
- :mod:`.local`: the driver on one machine without Ray (DataLoader workers decode, the
  encoders run in this process);
- :mod:`.plan`: ``engine.executor`` decided (``plan_engine``) and run (``execute``).

Both drivers write byte-identical outputs.
"""
