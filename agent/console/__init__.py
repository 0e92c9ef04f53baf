"""The local web console (``sortgate console``): the line live, readers, alarms, stats, parcel
search, the review and inspection bench, and commissioning — served on the box, offline, in its own
process, talking to the agent only over the control socket and reading the local journal."""
