// The live dashboard (/dashboard with `imgw serve --web`): scrapes /metrics every second and
// plots, per shard, connections, deliveries and sends per second, the send_ack latency
// percentiles and the shards' stage latencies, and the store's and backends' latencies, as
// plain SVG over the last two minutes. With an admin token (--admin-token-env) it asks for
// the token once and keeps it in the tab's sessionStorage.
const POINTS = 120;
const INTERVAL_MS = 1000;
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
/** Parses the Prometheus text format (the subset imgw writes: no timestamps). */
export function parse(text) {
    const out = new Map();
    for (const line of text.split("\n")) {
        if (line === "" || line.startsWith("#"))
            continue;
        const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$/.exec(line);
        if (!m)
            continue;
        const labels = {};
        if (m[3]) {
            for (const l of m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
                labels[l[1]] = l[2].replace(/\\(.)/g, "$1");
            }
        }
        const value = Number(m[4]);
        if (!Number.isFinite(value))
            continue;
        let list = out.get(m[1]);
        if (!list) {
            list = [];
            out.set(m[1], list);
        }
        list.push({ labels, value });
    }
    return out;
}
/** Sums a family's samples by the value of `by` (all into "" without it), keeping only the
 * samples whose labels include `where`. */
function sumBy(s, name, by, where = {}) {
    const out = new Map();
    for (const x of s.get(name) ?? []) {
        if (!Object.entries(where).every(([k, v]) => x.labels[k] === v))
            continue;
        const k = by ? (x.labels[by] ?? "") : "";
        out.set(k, (out.get(k) ?? 0) + x.value);
    }
    return out;
}
/** The `q` quantile (seconds) of a histogram's cumulative buckets `le -> count`, linear within
 * the bucket as Prometheus' histogram_quantile; null without observations. */
export function quantile(buckets, q) {
    const les = [...buckets.keys()].sort((a, b) => a - b);
    const total = buckets.get(Infinity) ?? 0;
    if (total <= 0)
        return null;
    const rank = q * total;
    let prevLe = 0;
    let prevCount = 0;
    for (const le of les) {
        const c = buckets.get(le) ?? 0;
        if (c >= rank) {
            if (le === Infinity)
                return prevLe;
            const inBucket = c - prevCount;
            return inBucket <= 0 ? le : prevLe + ((le - prevLe) * (rank - prevCount)) / inBucket;
        }
        prevLe = le;
        prevCount = c;
    }
    return prevLe;
}
/** A histogram family's bucket increases between two scrapes, by the label `by`. */
function bucketDeltas(prev, cur, name, where, by) {
    const out = new Map();
    const before = new Map();
    const id = (l) => JSON.stringify(l);
    for (const x of prev.get(`${name}_bucket`) ?? [])
        before.set(id(x.labels), x.value);
    for (const x of cur.get(`${name}_bucket`) ?? []) {
        if (!Object.entries(where).every(([k, v]) => x.labels[k] === v))
            continue;
        const k = by ? (x.labels[by] ?? "") : "";
        const le = x.labels.le === "+Inf" ? Infinity : Number(x.labels.le);
        const d = Math.max(0, x.value - (before.get(id(x.labels)) ?? 0));
        let b = out.get(k);
        if (!b) {
            b = new Map();
            out.set(k, b);
        }
        b.set(le, (b.get(le) ?? 0) + d);
    }
    return out;
}
/** One chart: its series (name -> the last POINTS values, null for a gap). */
class Chart {
    id;
    title;
    unit;
    series = new Map();
    root;
    constructor(id, title, unit) {
        this.id = id;
        this.title = title;
        this.unit = unit;
        this.root = document.createElement("div");
        this.root.className = "chart";
        this.root.dataset.testid = `chart-${id}`;
    }
    add(name, v) {
        let s = this.series.get(name);
        if (!s) {
            s = Array(POINTS).fill(null);
            this.series.set(name, s);
        }
        s.push(v);
        if (s.length > POINTS)
            s.splice(0, s.length - POINTS);
    }
    /** Series not updated this round get a gap. */
    pad(updated) {
        for (const [name, s] of this.series) {
            if (!updated.has(name)) {
                s.push(null);
                if (s.length > POINTS)
                    s.splice(0, s.length - POINTS);
            }
        }
    }
    render() {
        const ns = "http://www.w3.org/2000/svg";
        const W = 400;
        const H = 140;
        const top = 8;
        const left = 44;
        let max = 0;
        for (const s of this.series.values())
            for (const v of s)
                if (v !== null && v > max)
                    max = v;
        max = max > 0 ? max * 1.15 : 1;
        const h4 = document.createElement("h4");
        h4.textContent = this.title;
        const legend = document.createElement("div");
        legend.className = "legend";
        const svg = document.createElementNS(ns, "svg");
        svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
        svg.setAttribute("preserveAspectRatio", "none");
        const y = (v) => top + (H - top - 14) * (1 - v / max);
        for (const [frac, label] of [
            [1, fmt(max / 1.15, this.unit)],
            [0.5, fmt(max / 2, this.unit)],
            [0, "0"],
        ]) {
            const yy = y((max * frac));
            const line = document.createElementNS(ns, "line");
            line.setAttribute("x1", String(left));
            line.setAttribute("x2", String(W));
            line.setAttribute("y1", String(yy));
            line.setAttribute("y2", String(yy));
            line.setAttribute("stroke", "#e5e7eb");
            svg.append(line);
            const t = document.createElementNS(ns, "text");
            t.setAttribute("x", "2");
            t.setAttribute("y", String(yy + 4));
            t.setAttribute("font-size", "10");
            t.setAttribute("fill", "#6b7380");
            t.textContent = label;
            svg.append(t);
        }
        const xAxis = document.createElementNS(ns, "text");
        xAxis.setAttribute("x", String(left));
        xAxis.setAttribute("y", String(H - 2));
        xAxis.setAttribute("font-size", "10");
        xAxis.setAttribute("fill", "#6b7380");
        xAxis.textContent = `last ${POINTS} s`;
        svg.append(xAxis);
        let i = 0;
        for (const [name, s] of this.series) {
            const color = COLORS[i++ % COLORS.length];
            let d = "";
            let pen = false;
            s.forEach((v, k) => {
                if (v === null) {
                    pen = false;
                    return;
                }
                const x = left + ((W - left) * k) / (POINTS - 1);
                d += `${pen ? "L" : "M"}${x.toFixed(1)},${y(v).toFixed(1)}`;
                pen = true;
            });
            const path = document.createElementNS(ns, "path");
            path.setAttribute("d", d);
            path.setAttribute("fill", "none");
            path.setAttribute("stroke", color);
            path.setAttribute("stroke-width", "1.6");
            svg.append(path);
            const last = [...s].reverse().find((v) => v !== null) ?? null;
            const span = document.createElement("span");
            span.style.setProperty("--c", color);
            span.textContent = `${name}: ${last === null ? "-" : fmt(last, this.unit)}`;
            legend.append(span);
        }
        if (this.series.size === 0) {
            const empty = document.createElement("div");
            empty.className = "empty";
            empty.textContent = "no data yet";
            this.root.replaceChildren(h4, empty);
        }
        else {
            this.root.replaceChildren(h4, legend, svg);
        }
    }
}
function fmt(v, unit) {
    const n = Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2);
    return unit ? `${n} ${unit}` : n;
}
const charts = new Map();
function chart(id, title, unit) {
    let c = charts.get(id);
    if (!c) {
        c = new Chart(id, title, unit);
        charts.set(id, c);
        document.getElementById("charts")?.append(c.root);
    }
    return c;
}
function setTile(id, text) {
    const e = document.getElementById(id);
    if (e)
        e.textContent = text;
}
let prev = null;
let prevAt = 0;
function update(cur, at) {
    // Every chart exists from the first scrape, in a fixed order.
    const conns = chart("connections", "Connections per shard", "");
    const deliveries = chart("deliveries", "Deliveries / s per shard", "/s");
    const sends = chart("sends", "Sends / s per shard", "/s");
    const ack = chart("ack", "send_ack latency (all shards)", "ms");
    const stages = chart("stages", "Shard stages p99 per shard", "ms");
    const store = chart("store", "Store and backend latency (mean per second)", "ms");
    const io = chart("io", "Store commits / s and I/O queue depth", "");
    const errors = chart("errors", "Errors / s by code", "/s");
    const updated = new Map();
    const put = (c, name, v) => {
        c.add(name, v);
        let u = updated.get(c);
        if (!u) {
            u = new Set();
            updated.set(c, u);
        }
        u.add(name);
    };
    const byShard = sumBy(cur, "imgw_connections", "shard");
    const authed = sumBy(cur, "imgw_connections_authenticated", null).get("") ?? 0;
    let total = 0;
    for (const [shard, v] of byShard) {
        put(conns, `shard ${shard}`, v);
        total += v;
    }
    setTile("t-conns", `${total} (${authed})`);
    const delivered = sumBy(cur, "imgw_frames_out_total", "shard", { op: "deliver" });
    let deliveredTotal = 0;
    for (const v of delivered.values())
        deliveredTotal += v;
    setTile("t-deliveries", String(deliveredTotal));
    if (prev) {
        const dt = Math.max(0.001, (at - prevAt) / 1000);
        const rate = (name, where, chartOf, label, by = "shard") => {
            const before = sumBy(prev, name, by, where);
            let sum = 0;
            for (const [k, v] of sumBy(cur, name, by, where)) {
                const r = Math.max(0, v - (before.get(k) ?? 0)) / dt;
                sum += r;
                put(chartOf, label(k), r);
            }
            return sum;
        };
        const dps = rate("imgw_frames_out_total", { op: "deliver" }, deliveries, (k) => `shard ${k}`);
        setTile("t-dps", dps.toFixed(1));
        rate("imgw_frames_in_total", { op: "send" }, sends, (k) => `shard ${k}`);
        const ackAll = bucketDeltas(prev, cur, "imgw_stage_seconds", { stage: "send_ack" }, null).get("");
        for (const q of [0.5, 0.9, 0.99]) {
            const v = ackAll ? quantile(ackAll, q) : null;
            put(ack, `p${Math.round(q * 100)}`, v === null ? null : v * 1000);
            if (q === 0.99)
                setTile("t-ack", v === null ? "idle" : `${(v * 1000).toFixed(2)} ms`);
        }
        for (const stage of ["shard_queue", "output_wait", "send_ack"]) {
            for (const [shard, b] of bucketDeltas(prev, cur, "imgw_stage_seconds", { stage }, "shard")) {
                const v = quantile(b, 0.99);
                put(stages, `${stage} s${shard}`, v === null ? null : v * 1000);
            }
        }
        // Store and backends: every unlabelled *_seconds family with a sum and a count.
        let storeMean = null;
        for (const [name, samples] of cur) {
            if (!name.endsWith("_seconds_sum") || samples.some((s) => "shard" in s.labels))
                continue;
            const base = name.slice(0, -"_sum".length);
            const sum = (sumBy(cur, name, null).get("") ?? 0) - (sumBy(prev, name, null).get("") ?? 0);
            const count = (sumBy(cur, `${base}_count`, null).get("") ?? 0) - (sumBy(prev, `${base}_count`, null).get("") ?? 0);
            const mean = count > 0 ? (sum / count) * 1000 : null;
            put(store, base.replace(/^imgw_/, "").replace(/_seconds$/, ""), mean);
            if (base === "imgw_store_commit_seconds")
                storeMean = mean;
        }
        setTile("t-store", storeMean === null ? (cur.has("imgw_store_commit_seconds_sum") ? "idle" : "n/a") : `${storeMean.toFixed(2)} ms`);
        if (cur.has("imgw_store_commits_total")) {
            rate("imgw_store_commits_total", {}, io, () => "commits/s", "");
            put(io, "queue depth", sumBy(cur, "imgw_io_queue_depth", null).get("") ?? 0);
        }
        const errBefore = sumBy(prev, "imgw_errors_total", "code");
        for (const [code, v] of sumBy(cur, "imgw_errors_total", "code")) {
            const r = Math.max(0, v - (errBefore.get(code) ?? 0)) / dt;
            if (r > 0 || errors.series.has(code))
                put(errors, code, r);
        }
    }
    for (const c of charts.values()) {
        c.pad(updated.get(c) ?? new Set());
        c.render();
    }
    prev = cur;
    prevAt = at;
}
async function scrape() {
    const badge = document.getElementById("scrape");
    const token = sessionStorage.getItem("imgw-admin-token");
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    try {
        const res = await fetch("/metrics", { headers, cache: "no-store" });
        if (res.status === 401) {
            const form = document.getElementById("token-form");
            if (form)
                form.hidden = false;
            if (badge)
                badge.textContent = "admin token needed";
            return;
        }
        const text = await res.text();
        update(parse(text), Date.now());
        if (badge) {
            badge.textContent = `scraped ${new Date().toLocaleTimeString()}`;
            badge.className = "badge connected";
        }
    }
    catch (e) {
        if (badge) {
            badge.textContent = `scrape failed: ${e instanceof Error ? e.message : String(e)}`;
            badge.className = "badge closed";
        }
    }
}
function main() {
    const form = document.getElementById("token-form");
    if (form) {
        form.onsubmit = (ev) => {
            ev.preventDefault();
            const input = document.getElementById("token");
            sessionStorage.setItem("imgw-admin-token", input.value);
            form.hidden = true;
            void scrape();
        };
    }
    // One scrape at a time: the next is scheduled when this one is done.
    const loop = () => {
        void scrape().finally(() => setTimeout(loop, INTERVAL_MS));
    };
    loop();
}
if (typeof document !== "undefined")
    main();
