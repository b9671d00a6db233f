"""`sslbench run`: a pipeline of pretraining recipes x evaluation/transfer tasks x seeds.

Part of the core, yet it imports no stage: every job is an `sslbench` sub-command run as a
subprocess, so the stages stay independent and a crashing job cannot take the pipeline down.
"""
