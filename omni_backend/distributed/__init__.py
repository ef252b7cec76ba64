"""Parallel groups inside one model instance: CFG, sequence (Ulysses/Ring), tensor and pipeline parallel.

``groups`` builds one DeviceMesh with named dims; ``validate`` checks a ParallelConfig against the
model at load; ``denoiser`` runs one ``denoise(states)`` call of a family over the group; ``worker``
runs the ranks as spawned processes behind the runner's interface.
"""
