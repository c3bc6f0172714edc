"""Pure-torch core of FreeSpeed: schedules, caches, token grids, explicit attention (no comfy import)."""
