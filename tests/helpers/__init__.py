"""Shared test helpers: bit/ulp checks, float64 oracles, devices, the tiny model setup, verl scenarios, Triton AOT."""
