//! Fixed sample messages: one or more per op, and the benchmark's typical IM message.
//!
//! The golden vectors in tests/vectors/ are these samples encoded by every codec; the values
//! here must therefore never change (add new samples instead).

use super::*;

/// The typical IM message of SPEC 9 and the seed's benchmark: a `deliver` carrying a sender
/// id, a millisecond timestamp, a text body and an extras map of two entries.
pub fn typical_deliver() -> Envelope {
    let mut ext = Ext::new();
    ext.insert("client", "ios");
    Envelope::new(Message::Deliver(Deliver {
        mid: 1_700_000_000_123,
        from: "user_10086".into(),
        to: None,
        inbox_seq: 4242,
        ts: 1_700_000_000_123,
        kind: None,
        body: "Are we still on for lunch today?".into(),
        ext,
    }))
}

/// Named samples covering every op, optional fields present and absent, refs, non-ASCII text.
pub fn all() -> Vec<(&'static str, Envelope)> {
    let mut ext = Ext::new();
    ext.insert("k", "v");
    ext.insert("lang", "zh");
    vec![
        (
            "hello",
            Envelope::with_ref(
                Message::Hello(Hello {
                    version: 1,
                    token: "eyJhbGciOiJIUzI1NiJ9.e30.sig".into(),
                    device: "phone-1".into(),
                    codecs: vec!["protobuf".into(), "json".into()],
                    resume: Some(Resume { inbox_seq: 17 }),
                }),
                1,
            ),
        ),
        (
            "hello_min",
            Envelope::new(Message::Hello(Hello {
                version: 1,
                token: "alice".into(),
                device: "web".into(),
                codecs: vec![],
                resume: None,
            })),
        ),
        (
            "welcome",
            Envelope::with_ref(
                Message::Welcome(Welcome {
                    version: 1,
                    session: 77,
                    user: "alice".into(),
                    heartbeat_ms: 30_000,
                    server_time_ms: 1_700_000_000_000,
                    limits: Limits {
                        max_frame_bytes: 65_536,
                        sends_per_sec: 50,
                        window: 64,
                    },
                }),
                1,
            ),
        ),
        (
            "ping",
            Envelope::new(Message::Ping(Ping {
                ts: 1_700_000_000_001,
            })),
        ),
        (
            "pong",
            Envelope::new(Message::Pong(Pong {
                ts: 1_700_000_000_002,
            })),
        ),
        (
            "send",
            Envelope::with_ref(
                Message::Send(Send {
                    to: Target::User("bob".into()),
                    cmid: "c-1".into(),
                    kind: Some("text".into()),
                    body: "你好, bob 👋".into(),
                    ext: ext.clone(),
                }),
                2,
            ),
        ),
        (
            "send_group_min",
            Envelope::new(Message::Send(Send {
                to: Target::Group("g-42".into()),
                cmid: "c-2".into(),
                kind: None,
                body: "hi all".into(),
                ext: Ext::new(),
            })),
        ),
        (
            "send_ack",
            Envelope::with_ref(
                Message::SendAck(SendAck {
                    cmid: "c-1".into(),
                    mid: 9_007_199_254_740_991,
                    seq: 5,
                    ts: 1_700_000_000_003,
                }),
                2,
            ),
        ),
        ("deliver", typical_deliver()),
        (
            "deliver_group",
            Envelope::new(Message::Deliver(Deliver {
                mid: 12,
                from: "carol".into(),
                to: Some(Target::Group("g-42".into())),
                inbox_seq: 1,
                ts: 1_700_000_000_004,
                kind: Some("order.created".into()),
                body: "{\"order\":1}".into(),
                ext,
            })),
        ),
        (
            "ack",
            Envelope::new(Message::Ack(Ack {
                inbox_seq: 4242,
                group: None,
            })),
        ),
        (
            "ack_group",
            Envelope::new(Message::Ack(Ack {
                inbox_seq: 17,
                group: Some("g-42".into()),
            })),
        ),
        (
            "sync",
            Envelope::with_ref(
                Message::Sync(Sync {
                    after_inbox_seq: 100,
                    limit: 50,
                    group: None,
                }),
                3,
            ),
        ),
        (
            "sync_group",
            Envelope::with_ref(
                Message::Sync(Sync {
                    after_inbox_seq: 0,
                    limit: 100,
                    group: Some("g-42".into()),
                }),
                4,
            ),
        ),
        (
            "synced",
            Envelope::with_ref(
                Message::Synced(Synced {
                    up_to: 150,
                    more: true,
                    group: None,
                    groups: Vec::new(),
                }),
                3,
            ),
        ),
        (
            "synced_group",
            Envelope::with_ref(
                Message::Synced(Synced {
                    up_to: 17,
                    more: false,
                    group: Some("g-42".into()),
                    groups: Vec::new(),
                }),
                4,
            ),
        ),
        (
            "synced_unread_groups",
            Envelope::with_ref(
                Message::Synced(Synced {
                    up_to: 4242,
                    more: false,
                    group: None,
                    groups: vec!["g-42".into(), "team-7".into()],
                }),
                3,
            ),
        ),
        (
            "presence_set",
            Envelope::new(Message::PresenceSet(PresenceSet {
                status: Status::Busy,
            })),
        ),
        (
            "presence_sub",
            Envelope::with_ref(
                Message::PresenceSub(PresenceSub {
                    users: vec!["bob".into(), "carol".into()],
                }),
                4,
            ),
        ),
        (
            "presence",
            Envelope::new(Message::Presence(Presence {
                user: "bob".into(),
                status: Status::Offline,
                ts: 1_700_000_000_005,
            })),
        ),
        (
            "group_join",
            Envelope::with_ref(
                Message::GroupJoin(GroupJoin {
                    group: "g-42".into(),
                }),
                5,
            ),
        ),
        (
            "group_leave",
            Envelope::new(Message::GroupLeave(GroupLeave {
                group: "g-42".into(),
            })),
        ),
        ("ok", Envelope::with_ref(Message::Ok, 5)),
        (
            "error",
            Envelope::with_ref(
                Message::Error(Error {
                    code: ErrorCode::Overloaded,
                    message: "shard queue full".into(),
                    cmid: Some("c-9".into()),
                    retry_after_ms: Some(250),
                }),
                6,
            ),
        ),
        (
            "error_min",
            Envelope::new(Message::Error(Error {
                code: ErrorCode::Unsupported,
                message: "unknown op".into(),
                cmid: None,
                retry_after_ms: None,
            })),
        ),
        (
            "goaway",
            Envelope::new(Message::Goaway(Goaway {
                reason: "drain".into(),
                reconnect_ms: 1500,
            })),
        ),
    ]
}
