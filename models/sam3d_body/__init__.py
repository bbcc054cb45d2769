"""SAM 3D Body (3DB): single-image human mesh recovery with the MHR body model."""
