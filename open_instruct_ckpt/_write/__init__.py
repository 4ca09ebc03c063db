"""HOW a save is written: the Saver and its roles, the plan executor, staging, shards, safetensors and the
on-disk protocol (stage, seal, publish, clean up), the run lock and claim, generation configs."""
