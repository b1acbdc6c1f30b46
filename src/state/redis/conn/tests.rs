use super::*;

#[test]
fn slots_follow_redis_cluster() {
    // Values from Redis' CLUSTER KEYSLOT.
    assert_eq!(key_slot(b"somekey"), 11058);
    assert_eq!(key_slot(b"foo"), 12182);
    assert_eq!(key_slot(b"{pacer}:replicas"), key_slot(b"pacer"));
    assert_eq!(
        key_slot(b"{pacer}:r:0:x:g"),
        key_slot(b"{pacer}:pause:api:*")
    );
    // Only the first tag counts, and an empty one hashes the whole key.
    assert_eq!(key_slot(b"a{b}{c}"), key_slot(b"b"));
    assert_ne!(key_slot(b"{}a"), key_slot(b"{}b"));
}
