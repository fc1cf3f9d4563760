"""popo.learner"""
