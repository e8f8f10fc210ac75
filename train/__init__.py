"""Training and distillation of the shipped models (`livecache train …`): digits, features, video, avatar.

Training uses models, pipelines (the avatar's teacher renders through them) and cores; no front end.
"""
