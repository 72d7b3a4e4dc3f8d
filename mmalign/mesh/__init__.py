"""Meshes: file IO and validation (`io`), surface sampling (`sampling`), the embedded mesh world (`world`)."""
