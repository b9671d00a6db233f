"""Transfer of a pretrained backbone to dense tasks, and export to other frameworks' formats.

export.py writes detectron2 / torchvision checkpoints from a backbone artifact; each task
package (detection/, ...) trains on the backbone and writes a result record.
"""
