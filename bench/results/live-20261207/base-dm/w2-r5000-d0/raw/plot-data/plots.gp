set terminal pngcairo size 1000,600 noenhanced
set grid
set key top left
set output '/work/main/bench/results/live-20261207/base-dm/w2-r5000-d0/latency-vs-rate-dm.png'
set title 'dm (1:1), 64 B: e2e latency vs rate (median of runs, bars: min-max)'
set logscale x
set logscale y
set offsets graph 0.05, graph 0.05, 0, 0
set xlabel 'msg/s offered (= deliveries/s to the other member)'
set ylabel 'e2e latency (ms)'
set key outside right top
plot '/work/main/bench/results/live-20261207/base-dm/w2-r5000-d0/raw/plot-data/latency-vs-rate-dm-0.dat' using 1:5:6:7 with yerrorlines lc 1 dt 1 pt 7 lw 2 title 'chat p99', '/work/main/bench/results/live-20261207/base-dm/w2-r5000-d0/raw/plot-data/latency-vs-rate-dm-0.dat' using 1:2:3:4 with yerrorlines lc 1 dt 2 pt 7 lw 1 title 'chat p50'
unset logscale x
unset logscale y
set offsets 0, 0, 0, 0
set key inside top left
set output '/work/main/bench/results/live-20261207/base-dm/w2-r5000-d0/latency-dm-64-c10000-r5000.png'
set title 'end-to-end latency by percentile: dm 64 B @ 5,000 msg/s (10,000 conns) (median run)'
set logscale x
set logscale y
set xlabel 'percentile'
set ylabel 'ms'
set xtics ('50%%' 2, '90%%' 10, '99%%' 100, '99.9%%' 1000, '99.99%%' 10000)
plot '/work/main/bench/results/live-20261207/base-dm/w2-r5000-d0/raw/chat.dm.64.c10000.r5000.rep1.e2e.hgrm' using 4:1 with lines lw 2 lc 1 title 'chat'
unset logscale x
unset logscale y
set xtics auto
