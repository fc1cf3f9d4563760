"""popo.deploy"""
