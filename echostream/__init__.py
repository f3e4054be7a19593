"""EchoStream: StreamSpeech with an Emformer encoder, exported stage by stage for the edge.

Subpackages: ``echostream.models`` (PyTorch reference), ``echostream.export`` (ONNX/TensorRT),
``echostream.runtime`` (torch-free streaming runtime). Importing this package imports nothing heavy.
"""
__version__ = "0.1.0"
