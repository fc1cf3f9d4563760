"""popo.actors"""
