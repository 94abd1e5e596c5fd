set terminal pngcairo size 1600,1000 font ',10'
set termoption noenhanced
set output 'bench/results/soak-20261122T223259Z/soak.png'
set datafile separator ','
set datafile missing ''
set key outside right top
set grid
set xlabel 'minutes since load start'
set multiplot layout 2,2 title 'ngx_chat_module soak: soak-20261122T223259Z'
set arrow 1 from 5.000000, graph 0 to 5.000000, graph 1 nohead dt 3 lc rgb 'gray'
set arrow 2 from 10.000000, graph 0 to 10.000000, graph 1 nohead dt 3 lc rgb 'gray'
set title 'worker memory (MiB); second-half fit'
set ylabel 'MiB'
set samples 400
plot 'bench/results/soak-20261122T223259Z/soak-wide.csv' skip 1 using 1:6 with lines lw 2 lc 1 title 'w12935 RssAnon', \
     'bench/results/soak-20261122T223259Z/soak-wide.csv' skip 1 using 1:7 with lines dt 2 lc 1 title 'w12935 VmRSS', \
     (x >= 5.000000 && x <= 10.000000) ? (10656.476815 + 72.738535 * x) / 1024.0 : 1/0 with lines lw 1 lc rgb 'black' title sprintf('w12935 fit %.1f KiB/min', 72.738535), \
     'bench/results/soak-20261122T223259Z/soak-wide.csv' skip 1 using 1:10 with lines lw 2 lc 2 title 'w12936 RssAnon', \
     'bench/results/soak-20261122T223259Z/soak-wide.csv' skip 1 using 1:11 with lines dt 2 lc 2 title 'w12936 VmRSS', \
     (x >= 5.000000 && x <= 10.000000) ? (11448.229809 + -30.415533 * x) / 1024.0 : 1/0 with lines lw 1 lc rgb 'black' title sprintf('w12936 fit %.1f KiB/min', -30.415533)
set title 'open files per worker'
set ylabel 'fds'
plot 'bench/results/soak-20261122T223259Z/soak-wide.csv' skip 1 using 1:8 with lines lw 2 lc 1 title 'w12935 fds', \
     'bench/results/soak-20261122T223259Z/soak-wide.csv' skip 1 using 1:12 with lines lw 2 lc 2 title 'w12936 fds', \
     'bench/results/soak-20261122T223259Z/soak-wide.csv' skip 1 using 1:5 with lines lc rgb 'gray' title 'established (all workers)'
set title 'shared zone ngx_chat_module'
set ylabel 'MiB'
plot 'bench/results/soak-20261122T223259Z/soak-wide.csv' skip 1 using 1:2 with lines lw 2 lc rgb 'dark-red' title 'slab pages used (MiB)', \
     'bench/results/soak-20261122T223259Z/soak-wide.csv' skip 1 using 1:9 with lines dt 2 lc 1 title 'w12935 zone Rss (MiB)', \
     'bench/results/soak-20261122T223259Z/soak-wide.csv' skip 1 using 1:13 with lines dt 2 lc 2 title 'w12936 zone Rss (MiB)'
set title 'PostgreSQL client backends'
set ylabel 'connections'
plot 'bench/results/soak-20261122T223259Z/soak-wide.csv' skip 1 using 1:3 with lines lw 2 title 'all', 'bench/results/soak-20261122T223259Z/soak-wide.csv' skip 1 using 1:4 with lines lw 2 title 'nginx chat'
unset multiplot
