"""popo.verifier"""
