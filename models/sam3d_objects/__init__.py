"""SAM 3D Objects: single-image 3D object reconstruction (geometry, texture and layout)."""
