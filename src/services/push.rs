//! Push records: a message from the business side to a user or a group, not sent by any
//! client. They arrive on the Kafka push topic ([`super::kafka`]) or through the admin API's
//! `POST /push` ([`crate::admin`]); both parse them here and hand them to the owner shard of
//! their user or group through the I/O core ([`crate::iocore::Pusher`]), which stores them,
//! then delivers them like any message.

use serde::Deserialize;

use crate::protocol::{Str, Target};

/// A push record (JSON, docs/PROTOCOL.md "Push records"), from the Kafka push topic or the
/// admin API's `POST /push`:
/// `{"tenant": "t", "user": "u", "type": "promo", "body": "...", "from": "shop", "id": "x"}`
/// or with `"group": "g"` instead of `"user"`.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct PushJson {
    pub tenant: String,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub body: String,
    /// The sender shown to the recipient (default `system`).
    #[serde(default)]
    pub from: Option<String>,
    /// Idempotency key (the dedupe `cmid`); by default the source makes one up
    /// (`kafka:{partition}:{offset}`, `admin:{start}:{n}`).
    #[serde(default)]
    pub id: Option<String>,
}

/// A validated push record, ready for its owner shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushRecord {
    pub tenant: Str,
    pub to: Target,
    pub from: Str,
    pub cmid: Str,
    pub kind: Option<Str>,
    pub body: Str,
}

/// Longest id (tenant, user, group, from, type, id) a push record may carry.
pub const MAX_PUSH_ID: usize = 256;

/// Parses and checks one push record; `Err` says why it is dropped.
/// `default_id` makes the idempotency key of a record that has no `id`.
pub fn parse_push(
    bytes: &[u8],
    default_id: impl FnOnce() -> String,
    max_body: usize,
) -> Result<PushRecord, String> {
    let j: PushJson =
        serde_json::from_slice(bytes).map_err(|e| format!("not a push record: {e}"))?;
    let to = match (j.user, j.group) {
        (Some(u), None) => Target::User(Str::from(u)),
        (None, Some(g)) => Target::Group(Str::from(g)),
        _ => return Err("exactly one of user and group".into()),
    };
    let from = j.from.unwrap_or_else(|| "system".into());
    let cmid = j.id.unwrap_or_else(default_id);
    let ids = [&j.tenant, &from, &cmid];
    let target = match &to {
        Target::User(u) | Target::Group(u) => u.len(),
    };
    if ids.iter().any(|s| s.is_empty() || s.len() > MAX_PUSH_ID)
        || target == 0
        || target > MAX_PUSH_ID
        || j.kind.as_ref().is_some_and(|k| k.len() > MAX_PUSH_ID)
    {
        return Err("an id is empty or too long".into());
    }
    if j.body.len() > max_body {
        return Err("body too large".into());
    }
    Ok(PushRecord {
        tenant: Str::from(j.tenant),
        to,
        from: Str::from(from),
        cmid: Str::from(cmid),
        kind: j.kind.map(Str::from),
        body: Str::from(j.body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_records_parse_or_are_refused() {
        let r = parse_push(
            br#"{"tenant":"t","user":"u","type":"promo","body":"hi"}"#,
            || "kafka:2:7".into(),
            100,
        )
        .unwrap();
        assert_eq!(r.to, Target::User("u".into()));
        assert_eq!(&*r.cmid, "kafka:2:7");
        assert_eq!(&*r.from, "system");
        let g = parse_push(
            br#"{"tenant":"t","group":"g","body":"x","id":"k"}"#,
            || unreachable!("the record has an id"),
            100,
        )
        .unwrap();
        assert_eq!(g.to, Target::Group("g".into()));
        assert_eq!(&*g.cmid, "k");
        for bad in [
            &b"not json"[..],
            br#"{"tenant":"t","body":"no target"}"#,
            br#"{"tenant":"t","user":"u","group":"g","body":"both"}"#,
            br#"{"tenant":"","user":"u","body":"x"}"#,
            br#"{"tenant":"t","user":"u","body":"far too long for the limit"}"#,
            br#"{"tenant":"t","user":"u"}"#,
        ] {
            assert!(
                parse_push(bad, || "d".into(), 10).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
