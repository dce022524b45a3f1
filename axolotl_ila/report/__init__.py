"""A ranking shown with a selection: the heatmap (``heatmap``) and the lines of
text the search's log and ``axolotl-ila show`` print (``text``)."""
