//! Shared test support: proptest strategies for every message of the model.
#![allow(dead_code)]

pub mod gateway;

use imgw::protocol::*;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;

/// Integers on the wire are at most 2^63 - 1 (Hessian longs are signed; docs/PROTOCOL.md).
pub fn n() -> impl Strategy<Value = u64> {
    prop_oneof![0..300u64, 0..=i64::MAX as u64]
}

pub fn s() -> impl Strategy<Value = Str> {
    prop_oneof![
        "[a-z0-9_-]{0,12}".prop_map(Str::from),
        any::<String>().prop_map(|s| Str::from(s.chars().take(40).collect::<String>())),
    ]
}

fn ext() -> impl Strategy<Value = Ext> {
    btree_map(s(), s(), 0..4).prop_map(|m| m.into_iter().collect())
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![s().prop_map(Target::User), s().prop_map(Target::Group)]
}

fn status() -> impl Strategy<Value = Status> {
    proptest::sample::select(Status::ALL.to_vec())
}

pub fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u8>(), s(), s(), vec(s(), 0..3), option::of(n())).prop_map(
            |(version, token, device, codecs, resume)| Message::Hello(Hello {
                version,
                token,
                device,
                codecs,
                resume: resume.map(|inbox_seq| Resume { inbox_seq }),
            })
        ),
        (any::<u8>(), n(), s(), n(), n(), any::<(u32, u32, u32)>()).prop_map(
            |(version, session, user, heartbeat_ms, server_time_ms, l)| {
                Message::Welcome(Welcome {
                    version,
                    session,
                    user,
                    heartbeat_ms,
                    server_time_ms,
                    limits: Limits {
                        max_frame_bytes: l.0,
                        sends_per_sec: l.1,
                        window: l.2,
                    },
                })
            }
        ),
        n().prop_map(|ts| Message::Ping(Ping { ts })),
        n().prop_map(|ts| Message::Pong(Pong { ts })),
        (target(), s(), option::of(s()), s(), ext()).prop_map(|(to, cmid, kind, body, ext)| {
            Message::Send(Send {
                to,
                cmid,
                kind,
                body,
                ext,
            })
        }),
        (s(), n(), n(), n()).prop_map(|(cmid, mid, seq, ts)| Message::SendAck(SendAck {
            cmid,
            mid,
            seq,
            ts
        })),
        (
            n(),
            s(),
            option::of(target()),
            n(),
            n(),
            option::of(s()),
            s(),
            ext()
        )
            .prop_map(
                |(mid, from, to, inbox_seq, ts, kind, body, ext)| Message::Deliver(Deliver {
                    mid,
                    from,
                    to,
                    inbox_seq,
                    ts,
                    kind,
                    body,
                    ext,
                })
            ),
        (n(), option::of(s()))
            .prop_map(|(inbox_seq, group)| Message::Ack(Ack { inbox_seq, group })),
        (n(), any::<u32>(), option::of(s())).prop_map(|(after_inbox_seq, limit, group)| {
            Message::Sync(Sync {
                after_inbox_seq,
                limit,
                group,
            })
        }),
        (n(), any::<bool>(), option::of(s()), vec(s(), 0..4)).prop_map(
            |(up_to, more, group, groups)| Message::Synced(Synced {
                up_to,
                more,
                group,
                groups,
            })
        ),
        status().prop_map(|status| Message::PresenceSet(PresenceSet { status })),
        vec(s(), 0..4).prop_map(|users| Message::PresenceSub(PresenceSub { users })),
        (s(), status(), n()).prop_map(|(user, status, ts)| Message::Presence(Presence {
            user,
            status,
            ts
        })),
        s().prop_map(|group| Message::GroupJoin(GroupJoin { group })),
        s().prop_map(|group| Message::GroupLeave(GroupLeave { group })),
        Just(Message::Ok),
        (
            proptest::sample::select(ErrorCode::ALL.to_vec()),
            s(),
            option::of(s()),
            option::of(n())
        )
            .prop_map(
                |(code, message, cmid, retry_after_ms)| Message::Error(Error {
                    code,
                    message,
                    cmid,
                    retry_after_ms
                })
            ),
        (s(), n()).prop_map(|(reason, reconnect_ms)| Message::Goaway(Goaway {
            reason,
            reconnect_ms
        })),
    ]
}

pub fn envelope() -> impl Strategy<Value = Envelope> {
    (option::of(n()), message()).prop_map(|(reference, msg)| Envelope { reference, msg })
}
