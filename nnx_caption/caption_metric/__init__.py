"""The ``evaluate`` metric module of ``caption_metrics``: ``evaluate.load(metric_path())``.

A package only so that the module ships with nnx_caption; ``evaluate`` loads the script itself.
"""
