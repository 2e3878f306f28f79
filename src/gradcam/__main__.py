"""``python -m gradcam`` runs the command line."""

from gradcam.cli import main

main()
