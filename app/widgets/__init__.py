"""The dashboard's widgets, one module each; each redraws one slice of the `RunView` from the frames
(`looptree.app.messages.RunChanged`) it subscribed to (`base.RunWidget`)."""
