"""Real screens: modal dialogs and the help screen, one per module."""
