"""popo.common"""
