"""The app's workflows, one per module, each a layer over :class:`~..base.AppBase`."""
