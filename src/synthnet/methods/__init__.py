"""Training methods: functions over already-built objects (generator, data, optimiser); they never read config."""
