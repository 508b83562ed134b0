"""The model layer: attention, the Transformer's layers, the two models and their lean decoding step.

Depends on PyTorch alone. Masks are boolean, True = may attend (see ``attnlab.nn.attention``).
"""
