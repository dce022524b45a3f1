"""Do rankings hold still across seeds, datasets and warm-up length?"""
