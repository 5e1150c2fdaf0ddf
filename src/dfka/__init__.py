"""dfka: data-free knowledge amalgamation (Group-Stack Dual-GAN) as a Kubeflow pipeline.

The library is pure PyTorch plus plain Python. It never imports kfp: components/ and pipelines/ wrap it.
"""

__version__ = "0.1.0"
