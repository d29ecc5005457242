"""Retrieval-SfM: mine 3-D models from an unordered photo collection and export training tuples.

Stages (each a module with plain artefacts in a work folder): ``mine`` (features, BoW retrieval,
verified clusters, scene graph), ``colmap`` (the pycolmap adapter: database, matching, mapping in
child processes), ``model`` (reading models, alignment, pictures) and ``tuples`` (training tuples).
"""
