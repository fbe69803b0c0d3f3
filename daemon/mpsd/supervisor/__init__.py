"""The supervisor side of mpsd. Nothing under here imports torch or mlx."""
