type Labels = Record<string, string>;
interface Sample {
    labels: Labels;
    value: number;
}
type Scrape = Map<string, Sample[]>;
/** Parses the Prometheus text format (the subset imgw writes: no timestamps). */
export declare function parse(text: string): Scrape;
/** The `q` quantile (seconds) of a histogram's cumulative buckets `le -> count`, linear within
 * the bucket as Prometheus' histogram_quantile; null without observations. */
export declare function quantile(buckets: Map<number, number>, q: number): number | null;
export {};
