"""The ops console's hand-off inbox: selectors (``queue``) and admin views (``views``)."""
