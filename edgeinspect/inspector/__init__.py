"""``edgeinspect inspector``: a REST API and a web dashboard to try bundles on images and tune their threshold.

It predicts with the torch-free runtime only (``pip install '.[inspector]'``); see :mod:`edgeinspect.inspector.app`.
"""
