"""`megapack plan`: real models built on the meta device under a fake process group, and their memory estimate."""
