"""How a run trains: every decision made once (plan), precision, adapters, sharding, completion-only loss and
packing, the Trainer's samplers and callbacks, tracking and the run's report.
"""
