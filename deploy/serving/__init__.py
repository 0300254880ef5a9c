"""Serving a build folder without the build stack (onnxruntime, numpy and Pillow; FastAPI for the server): its
serving.json (spec.py), the build's preprocessing in Pillow + numpy (preprocess.py), the predictor, the HTTP
server, safe image decoding (images.py) and the Triton model repository export (triton.py)."""
