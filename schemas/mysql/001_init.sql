-- imgw durable store on MySQL / MariaDB 10.11: layout 1 (docs/STORE.md, "MySQL backend").
-- Applied once by imgw at start and recorded in schema_migrations; every statement is
-- idempotent (IF NOT EXISTS) so a migration interrupted half-way can run again.
-- Ids are VARBINARY: compared byte by byte (member and group lists come back in byte order),
-- at most 255 bytes each (longer ids are refused per op with IdTooLong).

-- The last inbox_seq of each inbox: the counter row locked (SELECT ... FOR UPDATE) by the
-- transaction that appends, which is what keeps the seqs gapless under concurrent writers.
CREATE TABLE IF NOT EXISTS inbox_head (
    tenant   VARBINARY(255)  NOT NULL,
    user_id  VARBINARY(255)  NOT NULL,
    last_seq BIGINT UNSIGNED NOT NULL,
    PRIMARY KEY (tenant, user_id)
) ENGINE = InnoDB;

-- Inbox messages: the Deliver as Protobuf (inbox_seq 0 inside: the key holds it).
CREATE TABLE IF NOT EXISTS inbox (
    tenant  VARBINARY(255)  NOT NULL,
    user_id VARBINARY(255)  NOT NULL,
    seq     BIGINT UNSIGNED NOT NULL,
    msg     MEDIUMBLOB      NOT NULL,
    PRIMARY KEY (tenant, user_id, seq)
) ENGINE = InnoDB;

-- Each device's inbox cursor.
CREATE TABLE IF NOT EXISTS device_cursor (
    tenant    VARBINARY(255)  NOT NULL,
    user_id   VARBINARY(255)  NOT NULL,
    device_id VARBINARY(255)  NOT NULL,
    seq       BIGINT UNSIGNED NOT NULL,
    PRIMARY KEY (tenant, user_id, device_id)
) ENGINE = InnoDB;

-- Each group's last gseq and member count (the group's counter row, locked like inbox_head).
CREATE TABLE IF NOT EXISTS group_head (
    tenant    VARBINARY(255)  NOT NULL,
    group_id  VARBINARY(255)  NOT NULL,
    last_gseq BIGINT UNSIGNED NOT NULL,
    members   BIGINT UNSIGNED NOT NULL,
    PRIMARY KEY (tenant, group_id)
) ENGINE = InnoDB;

-- Group timelines (the Deliver as Protobuf).
CREATE TABLE IF NOT EXISTS timeline (
    tenant   VARBINARY(255)  NOT NULL,
    group_id VARBINARY(255)  NOT NULL,
    gseq     BIGINT UNSIGNED NOT NULL,
    msg      MEDIUMBLOB      NOT NULL,
    PRIMARY KEY (tenant, group_id, gseq)
) ENGINE = InnoDB;

-- Members and their group cursors; by_member lists a user's groups.
CREATE TABLE IF NOT EXISTS group_member (
    tenant      VARBINARY(255)  NOT NULL,
    group_id    VARBINARY(255)  NOT NULL,
    member_id   VARBINARY(255)  NOT NULL,
    cursor_gseq BIGINT UNSIGNED NOT NULL,
    PRIMARY KEY (tenant, group_id, member_id),
    KEY by_member (tenant, member_id, group_id)
) ENGINE = InnoDB;

-- Send dedupe: (tenant, sender, cmid, destination) -> the first append's result.
-- dest_kind: 0 an inbox (dest is the user), 1 a group timeline (dest is the group).
CREATE TABLE IF NOT EXISTS dedupe (
    tenant    VARBINARY(255)   NOT NULL,
    sender    VARBINARY(255)   NOT NULL,
    cmid      VARBINARY(255)   NOT NULL,
    dest_kind TINYINT UNSIGNED NOT NULL,
    dest      VARBINARY(255)   NOT NULL,
    seq       BIGINT UNSIGNED  NOT NULL,
    mid       BIGINT UNSIGNED  NOT NULL,
    ts        BIGINT UNSIGNED  NOT NULL,
    stored_at BIGINT UNSIGNED  NOT NULL,
    PRIMARY KEY (tenant, sender, cmid, dest_kind, dest),
    KEY by_age (stored_at)
) ENGINE = InnoDB;
