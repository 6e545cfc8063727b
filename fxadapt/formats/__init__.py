"""Adapter files: fxadapt's own folder format, AdapterHub's and PEFT's, and Hub repo resolution.

``folder`` saves and loads a folder in any of them; ``native``, ``adapterhub`` and ``peft`` are the
formats; ``fileio`` (atomic writes, tensor reading) and ``keys`` (foreign names onto site keys) are the
leaf helpers that the formats and the methods' own naming hooks both use.
"""
