"""Local emulator of the billing APIs (used by the demo, the tests and the benchmark)."""
