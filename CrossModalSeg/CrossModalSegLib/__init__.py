"""Qt-free logic of the CrossModalSeg Slicer module: backend client and launcher, MRML conversions, workflow."""
