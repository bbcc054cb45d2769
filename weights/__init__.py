"""Model weights live in this directory (git-ignored); `manifest.json` lists what each set needs."""
