"""The ranking: its file (``file``), rankings on the Hub (``hub``), compare and
combine (``analysis``), and its pictures and text (``heatmap``, ``text``)."""
