set terminal pngcairo size 1000,600 noenhanced
set grid
set key top left
set output '/work/main/bench/results/live-20261207/base-group/w2-r1000-d0/latency-vs-rate-group-k10.png'
set title 'group K=10, 64 B: e2e latency vs deliveries/s (median of runs, bars: min-max)'
set logscale x
set logscale y
set offsets graph 0.05, graph 0.05, 0, 0
set xlabel 'deliveries/s offered (msg/s x K, the sender''s copy included)'
set ylabel 'e2e latency (ms)'
set key outside right top
plot '/work/main/bench/results/live-20261207/base-group/w2-r1000-d0/raw/plot-data/latency-vs-rate-group-k10-0.dat' using 1:5:6:7 with yerrorlines lc 1 dt 1 pt 5 lw 2 title 'chat p99', '/work/main/bench/results/live-20261207/base-group/w2-r1000-d0/raw/plot-data/latency-vs-rate-group-k10-0.dat' using 1:2:3:4 with yerrorlines lc 1 dt 2 pt 5 lw 1 title 'chat p50'
unset logscale x
unset logscale y
set offsets 0, 0, 0, 0
set key inside top left
set output '/work/main/bench/results/live-20261207/base-group/w2-r1000-d0/latency-group-64-c10000-r1000-k10.png'
set title 'end-to-end latency by percentile: group K=10, 64 B @ 1,000 msg/s = 10,000 deliveries/s (10,000 conns) (median run)'
set logscale x
set logscale y
set xlabel 'percentile'
set ylabel 'ms'
set xtics ('50%%' 2, '90%%' 10, '99%%' 100, '99.9%%' 1000, '99.99%%' 10000)
plot '/work/main/bench/results/live-20261207/base-group/w2-r1000-d0/raw/chat.group.64.c10000.r1000.k10.rep2.e2e.hgrm' using 4:1 with lines lw 2 lc 1 title 'chat'
unset logscale x
unset logscale y
set xtics auto
